"""The loading pipeline (`wcfmt.rebuild.stream.load_tensors`) and backend choice (`wcfmt.rebuild.backend`).

Every backend, thread count and piece size must give exactly ``reader.decode(name)``; errors
found by the reader on a worker thread must reach the caller as the reader raised them.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the "triton" backend runs in the interpreter here

import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from common import assert_bit_equal, blob_bytes, patch_blob, random_clustered, rewrite, small_tensors  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import wcfmt  # noqa: E402
from wcfmt import ChecksumError, FormatError, TensorNotFoundError, UsageError  # noqa: E402
from wcfmt.dtypes import from_numpy  # noqa: E402
from wcfmt.reader import WclustReader  # noqa: E402
from wcfmt.ordered_pool import bounded_map  # noqa: E402
from wcfmt.rebuild import backend as backend_mod  # noqa: E402
from wcfmt.rebuild import stream  # noqa: E402
from wcfmt.rebuild.backend import available_backends, default_backend, triton_available  # noqa: E402
from wcfmt.rebuild.stream import load_tensors  # noqa: E402

BACKENDS = ["numpy", "torch"] + (["triton"] if triton_available() else [])


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The common small file plus clustered tensors with many chunks, mixed K and every dtype."""
    tensors: dict[str, Any] = dict(small_tensors())
    tensors["many"] = random_clustered((61, 13), 32, chunk_rows=4, dtype=torch.bfloat16, seed=11)
    tensors["mixed"] = random_clustered((9, 7), [1, 2, 3, 16, 256], chunk_rows=2, dtype=torch.float32, seed=12)
    tensors["half"] = random_clustered((10, 3), 64, chunk_rows=10, dtype=torch.float16, seed=13)
    tensors["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    tensors["mask"] = torch.tensor([True, False, True])
    path = tmp_path_factory.mktemp("stream") / "model.wclust"
    wcfmt.save_file(tensors, path)
    return path


def decoded(reader: WclustReader, name: str) -> torch.Tensor:
    _, e = reader.resolve(name)
    return from_numpy(reader.decode(name), e.dtype).reshape(e.shape)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_canonical_decode(model: Path, backend: str, threads: int) -> None:
    with WclustReader(model) as r:
        got = load_tensors(r, backend=backend, threads=threads)
        assert list(got) == list(r.header.tensors)
        for name, t in got.items():
            assert_bit_equal(t, decoded(r, name))
        assert got["head"] is got["emb"]  # tied weights stay tied


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 9),
    chunk_rows=st.integers(1, 5),
    ks=st.lists(st.sampled_from([1, 2, 3, 4, 5, 16, 17, 32, 256]), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_shapes_property(rows: int, cols: int, chunk_rows: int, ks: list[int], dtype: torch.dtype, seed: int) -> None:
    n_chunks = -(-rows // chunk_rows)
    ct = random_clustered((rows, cols), [ks[i % len(ks)] for i in range(n_chunks)], chunk_rows, dtype, seed)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.wclust"
        wcfmt.save_file({"w": ct}, path)
        with WclustReader(path) as r:
            want = decoded(r, "w")
            for backend in ("numpy", "torch"):
                assert_bit_equal(load_tensors(r, backend=backend, threads=2)["w"], want)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if triton_available() else []))
def test_small_pieces_reuse_staging_slots(model: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "_PIECE_BYTES", 64)  # about one chunk per piece: slots are reused many times
    with WclustReader(model) as r:
        got = load_tensors(r, backend=backend, threads=2)
        for name, t in got.items():
            assert_bit_equal(t, decoded(r, name))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_converts_like_to(model: Path, backend: str, dtype: torch.dtype) -> None:
    with WclustReader(model) as r:
        got = load_tensors(r, backend=backend, dtype=dtype)
        for name, t in got.items():
            want = decoded(r, name)
            assert_bit_equal(t, want.to(dtype) if want.dtype.is_floating_point else want)


def test_names_subset_and_alias_without_target(model: Path) -> None:
    with WclustReader(model) as r:
        got = load_tensors(r, ["head", "many", "head"])
        assert list(got) == ["head", "many"]
        assert_bit_equal(got["head"], decoded(r, "emb"))
        with pytest.raises(TensorNotFoundError, match="nope"):
            load_tensors(r, ["many", "nope"])


def test_bad_arguments(model: Path) -> None:
    with WclustReader(model) as r:
        with pytest.raises(UsageError, match="backend"):
            load_tensors(r, backend="fortran")
        with pytest.raises(UsageError, match="CPU only"):
            load_tensors(r, backend="numpy", device="meta")
        with pytest.raises(UsageError, match="threads"):
            load_tensors(r, threads=0)
        with pytest.raises(UsageError, match="dtype"):
            load_tensors(r, dtype="float16")  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="floating-point"):
            load_tensors(r, dtype=torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["labels", "plane 0"])
def test_reader_errors_reach_the_caller(model: Path, tmp_path: Path, backend: str, kind: str) -> None:
    bad = tmp_path / "bad.wclust"
    bad.write_bytes(model.read_bytes())
    tensor = "many" if kind == "labels" else "emb"
    data = bytearray(blob_bytes(bad, tensor, 0, kind))
    data[0] ^= 0xFF
    patch_blob(bad, tensor, 0, kind, bytes(data), fix_crc=False)
    with WclustReader(bad) as r:
        with pytest.raises(ChecksumError, match=f"tensor '{tensor}'.*chunk 0"):
            load_tensors(r, backend=backend, threads=2)


def test_out_of_range_label_is_a_format_error(model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.wclust"
    bad.write_bytes(model.read_bytes())
    with WclustReader(bad) as r:
        encoding = r.header.tensors["half"].chunks[0].labels.encoding
    if encoding != "raw":
        pytest.skip("the label plane is zstd-coded; test_reader covers crafted frames")
    data = bytearray(blob_bytes(bad, "half", 0, "labels"))
    data[7] = 200  # K = 64
    patch_blob(bad, "half", 0, "labels", bytes(data))
    with WclustReader(bad) as r, pytest.raises(FormatError, match="label 200"):
        load_tensors(r)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("tensor", ["many", "emb"])
def test_huge_shape_fails_before_allocating(
    model: Path, tmp_path: Path, tensor: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header claiming more than its blobs hold is refused before the output is allocated (spec §9.1)."""
    bad = tmp_path / "huge.wclust"
    bad.write_bytes(model.read_bytes())

    def grow(h: dict[str, Any]) -> None:
        for e in h["tensors"].values():
            if e is h["tensors"][tensor] or e.get("target") == tensor:
                e["shape"][1] = 2**40

    rewrite(bad, grow)
    sizes: list[int] = []
    real = torch.empty

    def spy(*shape: Any, **kw: Any) -> torch.Tensor:
        t = real(*shape, **kw)
        sizes.append(t.numel())
        return t

    monkeypatch.setattr(torch, "empty", spy)
    with WclustReader(bad) as r, pytest.raises(FormatError, match=f"tensor '{tensor}'"):
        load_tensors(r, backend=backend)
    assert max(sizes, default=0) < 2**20


class FakeReader:
    """Only what `load_tensors` documents that it needs: no ``entry``, no ``decode``."""

    def __init__(self, real: WclustReader) -> None:
        self.header = real.header
        self.read_labels = real.read_labels
        self.read_centroids = real.read_centroids
        self.decode_chunk = real.decode_chunk


def test_minimal_reader_interface(model: Path) -> None:
    with WclustReader(model) as r:
        got = load_tensors(FakeReader(r), backend="torch", threads=2)
        for name, t in got.items():
            assert_bit_equal(t, decoded(r, name))


def test_host_memory_in_flight_is_bounded() -> None:
    live = 0
    peak = 0
    lock = threading.Lock()

    def job() -> None:
        nonlocal live, peak
        with lock:
            live += 1
            peak = max(peak, live)
        time.sleep(0.001)

    def consumed(_: None) -> None:
        nonlocal live
        time.sleep(0.003)  # a slow consumer: producers must wait for it
        with lock:
            live -= 1

    with ThreadPoolExecutor(4) as pool:
        for r in bounded_map(pool, [job] * 40, depth=3):
            consumed(r)
    assert peak <= 3


def test_worker_error_stops_submission() -> None:
    calls = []

    def job(i: int) -> Any:
        def run() -> int:
            calls.append(i)
            if i == 2:
                raise RuntimeError("boom")
            return i

        return run

    with ThreadPoolExecutor(1) as pool, pytest.raises(RuntimeError, match="boom"):
        list(bounded_map(pool, [job(i) for i in range(100)], depth=2))
    assert len(calls) < 10


# -- backend choice ----------------------------------------------------------------------------
def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    assert default_backend("cpu") == "numpy"
    assert default_backend("meta") == "torch"
    assert available_backends("cpu")[-2:] == ["torch", "numpy"]
    assert "numpy" not in available_backends("meta")
    if triton_available():
        assert default_backend("cuda") == "triton"
        assert "triton" in available_backends()
    monkeypatch.setenv(backend_mod.ENV_VAR, "torch")
    assert default_backend("cpu") == "torch"
    monkeypatch.setenv(backend_mod.ENV_VAR, "numpy")
    with pytest.raises(UsageError, match="cannot rebuild on device meta"):
        default_backend("meta")
    monkeypatch.setenv(backend_mod.ENV_VAR, "cobol")
    with pytest.raises(UsageError, match="WCFMT_BACKEND"):
        default_backend("cpu")


def test_backend_env_reaches_load_tensors(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    used = []
    real = stream._run_device
    monkeypatch.setattr(stream, "_run_device", lambda *a: used.append(a[-1]) or real(*a))
    monkeypatch.setenv(backend_mod.ENV_VAR, "torch")
    with WclustReader(model) as r:
        load_tensors(r)
    assert used == ["torch"]


def test_without_triton_every_path_works(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_mod, "triton_available", lambda: False)
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    assert "triton" not in available_backends()
    assert default_backend("cuda") == "torch"
    with WclustReader(model) as r:
        got = load_tensors(r)
        assert_bit_equal(got["many"], decoded(r, "many"))


def test_without_triton_installed(model: Path) -> None:
    """In a process where ``import triton`` fails, everything still loads (and triton stays unimported)."""
    code = f"""
import sys
sys.modules["triton"] = None  # import triton -> ImportError, as on platforms without it
import torch
from wcfmt.reader import WclustReader
from wcfmt.rebuild.backend import available_backends, default_backend
from wcfmt.rebuild.stream import load_tensors
assert "triton" not in available_backends(), available_backends()
assert default_backend("cuda") == "torch"
with WclustReader({str(model)!r}) as r:
    for backend in ("numpy", "torch"):
        got = load_tensors(r, backend=backend)
        for name, t in got.items():
            assert torch.equal(t.reshape(-1).view(torch.uint8), torch.from_numpy(r.decode(name).reshape(-1).view("u1")))
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != backend_mod.ENV_VAR}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


# -- CUDA --------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_load_matches_cpu(model: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not importable here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(stream, "_PIECE_BYTES", 256)
    with WclustReader(model) as r:
        got = load_tensors(r, device="cuda", backend=backend, threads=2)
        for name, t in got.items():
            assert t.device.type == "cuda"
            assert_bit_equal(t.cpu(), decoded(r, name))
        assert got["head"] is got["emb"]


def test_fast_and_reference_agree_on_a_file(model: Path) -> None:
    """The pipeline's numpy path is the fast one: a chunk via the reader equals rebuild_chunk_fast."""
    from wcfmt.rebuild.fast import rebuild_chunk_fast
    from wcfmt.rebuild.reference import centroids_as

    with WclustReader(model) as r:
        e = r.header.tensors["many"]
        for i, c in enumerate(e.chunks):
            want = r.decode_chunk("many", i)
            table = centroids_as(r.read_centroids("many", i), e.dtype)
            got = rebuild_chunk_fast(r.read_labels("many", i), c.label_bits, want.size, table)
            assert np.array_equal(got, want)
